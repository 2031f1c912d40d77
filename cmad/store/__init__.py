"""The journal: the SQLite store, its row rules and recovery into a core.

May import the core and below; never the daemon or the clients.
"""
