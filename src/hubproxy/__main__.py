from hubproxy.cli import main

raise SystemExit(main())
