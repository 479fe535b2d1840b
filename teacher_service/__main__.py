"""`python -m teacher_service --model DIR ...`: the same as `hybrid-distill serve`."""

import sys

from teacher_service.server import main

sys.exit(main())
