"""How ranks start and meet: the process group, the ``--nproc`` launcher, a rank's tie to its launcher, and
the command lines they pass on. Below the engine: it knows no sweep, backend or report."""
