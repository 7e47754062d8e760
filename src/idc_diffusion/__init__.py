"""IDC-Diffusion: from an IDC cohort to a fine-tuned, evaluated Stable Diffusion model."""

__version__ = "0.1.0"
