"""vggflow: VGG19 transfer learning as a reproducible, tracked, scheduled pipeline."""

__version__ = "0.1.0"
