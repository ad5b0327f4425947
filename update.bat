@echo off
rem Update to the newest version (git pull) and bring the installed packages in step.
setlocal
set "HERE=%~dp0"
cd /d "%HERE%"
git pull --ff-only || goto :failed
if exist "%HERE%.venv\Scripts\python.exe" (
    "%HERE%.venv\Scripts\python.exe" -m pip install -r "%HERE%requirements.txt" || goto :failed
) else (
    echo No .venv yet: run install.bat
)
pause
exit /b 0
:failed
echo The update failed; the message above says why.
pause
exit /b 1
