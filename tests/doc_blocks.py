"""Runs the Python code blocks of a Markdown page, top to bottom.

``python tests/doc_blocks.py PAGE.md`` executes every fenced block whose info
string is ``python`` in one namespace, in order, as a reader would paste them,
and exits non-zero on the first failure with a traceback that names the page
and its line. Blocks fenced otherwise (``bash``, ``text``, ...) are not run.
``tests/test_docs.py`` runs every guide and the README this way.
"""

import pathlib
import re
import sys
import time

_FENCE = re.compile(r'^(\s*)(`{3,}|~{3,})\s*(.*)$')


def python_blocks(text: str) -> list[tuple[int, str]]:
  """``(first line number, source)`` of each ``python`` block of ``text``."""
  blocks, lines = [], text.splitlines()
  i = 0
  while i < len(lines):
    match = _FENCE.match(lines[i])
    if not match:
      i += 1
      continue
    indent, fence, info = match.groups()
    body, j = [], i + 1
    while j < len(lines) and not lines[j].strip().startswith(fence):
      body.append(lines[j][len(indent):] if lines[j].startswith(indent)
                  else lines[j].lstrip())
      j += 1
    if info.strip() == 'python':
      blocks.append((i + 2, '\n'.join(body) + '\n'))
    i = j + 1
  return blocks


def run(path: pathlib.Path) -> int:
  """Executes the page's blocks; returns how many ran."""
  namespace = {'__name__': '__main__'}
  blocks = python_blocks(path.read_text())
  for line, source in blocks:
    start = time.perf_counter()
    # Padding with blank lines makes tracebacks show the page's own lines.
    code = compile('\n' * (line - 1) + source, str(path), 'exec')
    exec(code, namespace)  # pylint: disable=exec-used
    print(f'{path}:{line}: {time.perf_counter() - start:.1f} s', file=sys.stderr)
  return len(blocks)


if __name__ == '__main__':
  count = run(pathlib.Path(sys.argv[1]))
  print(f'{sys.argv[1]}: {count} blocks ran')
