@echo off
rem Update to the newest version (git pull) and bring the installed packages in step.
setlocal
set "HERE=%~dp0"
cd /d "%HERE%"
git pull --ff-only || goto :failed
if exist "%HERE%.venv\Scripts\python.exe" (
    "%HERE%.venv\Scripts\python.exe" -m pip install -r "%HERE%requirements.txt" || goto :failed
    rem installed with --gpu: keep the GPU onnxruntime, not requirements.txt's CPU one (they share one folder)
    "%HERE%.venv\Scripts\python.exe" -m pip show -q onnxruntime-gpu >nul 2>nul && (
        "%HERE%.venv\Scripts\python.exe" -m pip uninstall -y -q onnxruntime onnxruntime-gpu
        "%HERE%.venv\Scripts\python.exe" -m pip install -c "%HERE%constraints.txt" -r "%HERE%requirements-gpu.txt" || goto :failed
    )
) else (
    echo No .venv yet: run install.bat
)
pause
exit /b 0
:failed
echo The update failed; the message above says why.
pause
exit /b 1
