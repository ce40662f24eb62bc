"""``python -m lapse.web.liveview --demo``."""

from lapse.web.liveview._demo import main

main()
