"""The store: the SQLite journal (``journal``) and what its rows may hold (``rows``).

May import the core and below; never the daemon or the clients.  What
recovery does with the rows (keeps, drops, refuses) is the daemon's policy:
``cmad.daemon.recovery``.
"""
