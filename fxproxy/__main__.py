from fxproxy.cli import main

raise SystemExit(main())
