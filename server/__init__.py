"""HTTP side of Easel. Never imports torch or diffusers."""
