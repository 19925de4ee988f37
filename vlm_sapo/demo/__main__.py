"""`python -m vlm_sapo.demo`: the CPU demo (see `vlm_sapo.demo.pipeline`)."""

from vlm_sapo.demo.pipeline import main

raise SystemExit(main())
