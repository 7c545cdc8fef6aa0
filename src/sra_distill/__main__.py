from sra_distill.cli import main

raise SystemExit(main())
