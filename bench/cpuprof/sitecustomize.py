"""Loaded by every Python process of a gateway that bench/cpu_profile.py starts (it puts this folder
on PYTHONPATH and sets SMTPGW_CPROFILE): the signal SIGRTMIN+3 switches a cProfile of the main
(reactor) thread on, and the next one writes it to $SMTPGW_CPROFILE/<pid>.prof. The timer is the
thread's CPU clock, so time spent waiting for a CPU on a loaded machine is not charged to anyone."""
import os

if os.environ.get("SMTPGW_CPROFILE"):
    import cProfile
    import signal
    import time

    _profile: list = []

    def _toggle(signum, frame):
        if not _profile:
            _profile.append(cProfile.Profile(time.thread_time))
            _profile[0].enable()
            return
        prof = _profile.pop()
        prof.disable()
        prof.dump_stats(os.path.join(os.environ["SMTPGW_CPROFILE"], f"{os.getpid()}.prof"))

    signal.signal(signal.SIGRTMIN + 3, _toggle)
