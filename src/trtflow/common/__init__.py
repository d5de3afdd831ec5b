"""What both wings use: the detector's definitions and head contract, image and COCO reading, the one pre- and postprocessing, metrics, the plugin library, ONNX Runtime sessions, Q/DQ placement."""
