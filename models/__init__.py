"""Model files shipped with idc; located at run time with importlib.resources."""
