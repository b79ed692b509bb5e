"""The quantization library: models, calibration data, the layer walker, methods, artifacts,
evaluation. Knows nothing of jobs, HTTP or Celery."""
