"""Talking to a running guest: SSH, the host's client of the guest agent, `lab.exec`, and kernel traces.

``inside/`` is the code that runs *in* the guest: stdlib only, copied there by ``client``.
"""
