from rayad.scoring.maps import anomaly_map, image_score
from rayad.scoring.threshold import f1_threshold, quantile_threshold

__all__ = ["anomaly_map", "f1_threshold", "image_score", "quantile_threshold"]
