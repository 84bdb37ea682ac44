from cetvm.cli.main import main

raise SystemExit(main())
