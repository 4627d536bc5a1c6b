"""installers/: the PyInstaller build, the installers, the accelerator builds."""
