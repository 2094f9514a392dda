"""BaFT: basis-level representation fine-tuning for knowledge editing."""
from .attach import Attachment, InterventionSet, find_decoder_layers
from .config import EditConfig
from .data import EditRequest, Probe, load_edits
from .editor import Editor
from .intervention import BasisIntervention
from .models import LoadedModel, load_model
from .training import EditResult

__all__ = [
    "Attachment",
    "BasisIntervention",
    "EditConfig",
    "EditRequest",
    "EditResult",
    "Editor",
    "InterventionSet",
    "LoadedModel",
    "Probe",
    "find_decoder_layers",
    "load_edits",
    "load_model",
]
