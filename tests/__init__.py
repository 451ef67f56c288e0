"""natpool's test suite, laid out like the package: ``tests/<sub>/`` tests ``natpool/<sub>/``.

Every directory is a package, so pytest's default ``prepend`` import mode names
modules by their full dotted path (``tests.core.test_pool``; two directories
may hold files of the same name) and helpers are imported absolutely from
``tests.support``. That works from a copy of this directory elsewhere too, as
long as the copy is still called ``tests`` (``.ci/wheel-check`` does that).
``tests/test_layout.py`` keeps the layout honest.
"""
