"""The comparison methods: one module per method (or one package per family of methods, with the
machinery only they use beside them).

Every class defined here that subclasses :class:`quari.methods.RetrievalMethod` and sets a
``name`` is a method the config can ask for; :func:`quari.methods.get_method` finds it. Adding a
baseline is dropping one module here.
"""
