"""HW2P2-style face classification and verification with marginloss heads.

The modules are scripts (``python examples/face/train.py --help``); they import each other
as ``face.<module>`` with the ``examples/`` directory on ``sys.path``, which each script
arranges when run as a file.
"""
