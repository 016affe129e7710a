from sealserve.cli.main import main

raise SystemExit(main())
