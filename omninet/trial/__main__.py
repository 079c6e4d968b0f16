import sys

from omninet.trial.runner import trial_main

sys.exit(trial_main())
