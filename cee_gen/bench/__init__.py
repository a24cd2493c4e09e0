"""The benchmark harness (`cee-bench`): datasets x strategies x thresholds, calibration, reports."""
