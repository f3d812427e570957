from fastarch.compile_report.cli import main

raise SystemExit(main())
