"""What the training hook and the controller share: the wire messages and the schedule math.

``trimtab.protocol.wire`` defines every message on the ZeroMQ link (pydantic models, the
framing and the error codes); ``trimtab.protocol.schedules`` holds the closed-form LR and
momentum schedules that a live schedule on the wire names, evaluated by the client at every
step and by the controller's policies when they plan; ``trimtab.protocol.ring`` the rule of
which checkpoints a client's ring keeps, applied by its store and predicted by the
controller. Neither side imports the other: the client (``trimtab.client``) and the
controller (``trimtab.controller``) both import this package, and it imports neither of
them, nor torch.
"""
