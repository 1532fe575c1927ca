"""The notebooks run, top to bottom, in a real Jupyter kernel (CPU only)."""

import json
import pathlib
import sys

import nbclient
import nbformat
import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / 'notebooks'


@pytest.fixture
def kernel_name(tmp_path, monkeypatch):
  """A kernelspec for this interpreter, found before any other on the path."""
  name = 'soap-optax-tests'
  spec_dir = tmp_path / 'kernels' / name
  spec_dir.mkdir(parents=True)
  (spec_dir / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f',
               '{connection_file}'],
      'display_name': 'soap_optax tests',
      'language': 'python',
  }))
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path))
  return name


@pytest.mark.parametrize('name', ['shampoo_adafactor_identity.ipynb'])
def test_notebook_executes_without_errors(name, kernel_name):
  notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
  client = nbclient.NotebookClient(
      notebook, timeout=300, kernel_name=kernel_name,
      resources={'metadata': {'path': str(NOTEBOOKS)}})
  client.execute()  # raises CellExecutionError on any failing cell.
  images = [o for c in notebook.cells for o in c.get('outputs', [])
            if 'image/png' in o.get('data', {})]
  assert len(images) == 2  # the drift plot and the loss curves.
