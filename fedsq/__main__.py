from fedsq.cli import main

raise SystemExit(main())
