"""The TensorBoard "memorization" plugin (registered in setup.py)."""
