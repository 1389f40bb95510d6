"""On-device runtime: load verified bundles and run them (ONNX Runtime / LiteRT). See issue 3."""

__all__: list[str] = []
