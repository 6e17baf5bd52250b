"""Checkpoints without their model, and the command line over them.

* :mod:`.offline`: ``check_state_dict``, ``project_state_dict``;
* :mod:`.reading`: which weights a state_dict holds, and their layouts;
* :mod:`.files`: checkpoint files: safe loading, the memory guard, saving, safetensors;
* :mod:`.outputs`: the files one command writes, all or none;
* :mod:`.guards`: the command line's guards: signals, stdout, the user's ``--model`` code;
* :mod:`.cli`: the ``nwave-param`` entry point; :mod:`.commands`: its commands.

Imports the core, the engine and the base.  Importing this package imports nothing (no torch):
the command line installs its signal handling before torch loads.  The one import out of the
part is the ``demo`` command's, of :mod:`nwave_param.demo`, when that command runs.
"""
