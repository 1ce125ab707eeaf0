"""Networks. Importing this package registers every model."""

from rayad.models import sdc_ccm  # noqa: F401  (registers sdc_ccm, sdc_ae)
from rayad.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
