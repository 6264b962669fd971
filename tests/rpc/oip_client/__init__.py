"""Open Inference Protocol clients of tests/rpc/test_oip.py: `messages` builds requests with the
server's own messages; errors.py is a script that runs under tritonclient in build/oip-venv."""
