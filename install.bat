@echo off
rem Install into .venv beside this file: torch first (CUDA build), then requirements.txt.
rem Re-running it repairs or updates the environment. Works from a path with spaces.
rem   install.bat --test   also the test dependencies;  install.bat --gpu   also xformers and onnxruntime-gpu
rem   set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu   before running picks another torch build.
setlocal
set "HERE=%~dp0"
cd /d "%HERE%"
for %%a in (%*) do (
    if /i "%%~a"=="--test" set "WANT_TEST=1"
    if /i "%%~a"=="--gpu" set "WANT_GPU=1"
)
set "PYTHON="
where py >nul 2>nul && (py -3.11 -c "" >nul 2>nul && set "PYTHON=py -3.11")
if not defined PYTHON (where py >nul 2>nul && (py -3.10 -c "" >nul 2>nul && set "PYTHON=py -3.10"))
if not defined PYTHON (where python >nul 2>nul && set "PYTHON=python")
if not defined PYTHON (
    echo Python was not found: install Python 3.10 or 3.11 from python.org, with "Add to PATH" and tcl/tk, then run this again.
    pause
    exit /b 1
)
%PYTHON% -c "import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 12) else 1)"
if errorlevel 1 (
    echo This Python is not supported: install Python 3.10 or 3.11 and run this again.
    pause
    exit /b 1
)
if not exist "%HERE%.venv\Scripts\python.exe" (
    echo creating .venv
    %PYTHON% -m venv "%HERE%.venv" || goto :failed
)
set "VPY=%HERE%.venv\Scripts\python.exe"
"%VPY%" -m pip install --upgrade pip || goto :failed
for /f "tokens=2 delims==" %%v in ('findstr /b "torch==" "%HERE%constraints.txt"') do set "TORCH_VERSION=%%v"
if not defined TORCH_INDEX_URL set "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128"
"%VPY%" -m pip install "torch==%TORCH_VERSION%" --index-url "%TORCH_INDEX_URL%" || goto :failed
"%VPY%" -m pip install -r "%HERE%requirements.txt" || goto :failed
if defined WANT_TEST (
    "%VPY%" -m pip install -r "%HERE%requirements-test.txt" || goto :failed
)
if defined WANT_GPU (
    rem onnxruntime-gpu and requirements.txt's onnxruntime share one folder: only the GPU build may stay
    "%VPY%" -m pip uninstall -y -q onnxruntime onnxruntime-gpu >nul 2>nul
    "%VPY%" -m pip install -c "%HERE%constraints.txt" -r "%HERE%requirements-gpu.txt" || goto :failed
)
echo.
echo Installed. Double-click run_popup.bat to answer questions, or edit ArgsList.py and run run_command_line.bat.
pause
exit /b 0
:failed
echo.
echo The installation failed; the message above says why. Fix it and run install.bat again.
pause
exit /b 1
