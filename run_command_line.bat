@echo off
rem Train with the settings in ArgsList.py, a JSON file or flags: run_command_line.bat [--setting value ...]
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
"%PY%" "%HERE%main.py" %*
set "CODE=%ERRORLEVEL%"
pause
exit /b %CODE%
