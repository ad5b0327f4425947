@echo off
rem Write natural-language captions for a folder of images. Double-click to answer questions in windows, or: caption_images.bat --help
rem Works from any folder and from paths with spaces. Uses .venv (made by install.bat) unless
rem LETS_PYTHON names another python.exe.
setlocal
set "HERE=%~dp0"
if defined LETS_PYTHON (set "PY=%LETS_PYTHON%") else (set "PY=%HERE%.venv\Scripts\python.exe")
if not exist "%PY%" (
    echo No Python environment at "%HERE%.venv": run install.bat first, or set LETS_PYTHON.
    pause
    exit /b 1
)
if defined PYTHONPATH (set "PYTHONPATH=%HERE%;%PYTHONPATH%") else (set "PYTHONPATH=%HERE%")
if "%~1"=="" (
    "%PY%" "%HERE%scripts\caption_images.py" --popup
) else (
    "%PY%" "%HERE%scripts\caption_images.py" %*
)
set "CODE=%ERRORLEVEL%"
pause
exit /b %CODE%
