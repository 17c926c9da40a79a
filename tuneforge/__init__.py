"""tuneforge: every established fine-tuning method for pretrained language models, side by side."""

from tuneforge.errors import UserError
from tuneforge.eval.generate import generate
from tuneforge.io.load import load_model
from tuneforge.methods import get_method

__version__ = "0.1.0"
__all__ = ["UserError", "generate", "get_method", "load_model"]
