"""`python -m idc_diffusion STAGE ...`: the command every workflow rule runs."""

from idc_diffusion.cli import main

raise SystemExit(main())
