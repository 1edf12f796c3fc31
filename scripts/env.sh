# Sourced by the scripts: lets Open MPI run as root (containers, CI) and on more processes than
# cores, and gives each rank its share of the cores for OpenMP and OpenBLAS.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1
MPIRUN="mpirun --oversubscribe"
