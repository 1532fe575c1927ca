"""Independent float64 NumPy references, written from the math (not the library)."""
