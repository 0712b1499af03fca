import sys

from vis4mer.orchestrator.cli.main import main

sys.exit(main())
