"""idc training: data discovery, patient-level splits, tf.data input and CancerNet (TensorFlow side)."""
