from uniremoval.cli import main

raise SystemExit(main())
