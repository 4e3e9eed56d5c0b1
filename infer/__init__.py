"""idc inference: score IDC patches with an ONNX CancerNet on a lab PC (onnxruntime only)."""

__version__ = "0.1.0"
