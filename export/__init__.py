"""idc export: Keras -> ONNX with the preprocessing contract inside, and the gates that guard it."""
