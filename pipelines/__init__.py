"""GPU side of Easel: everything that touches torch and diffusers lives under this package."""

from pipelines.library_logging import install_filters

install_filters()  # first, so that the filters are in place before any module here imports transformers
