"""GPU side of Easel: everything that touches torch and diffusers lives under this package."""
