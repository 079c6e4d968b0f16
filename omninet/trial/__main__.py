import sys

from omninet.trial.cli import trial_main

sys.exit(trial_main())
