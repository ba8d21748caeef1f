using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using Vmsnap.Migration;
using Vmsnap.Tests.Interop;
using Vmsnap.Tests.Migration;
using Vmsnap.Tests.Qcow2;
using static Vmsnap.Tests.Snapshots.VmKit;

namespace Vmsnap.Tests.Cli;

/// <summary>
/// Real SIGINT and SIGTERM sent to a running <c>vmsnap import</c> that reads a stream from a pipe
/// the test stops feeding: vmsnap ends with 130 or 143 (128 + the signal, what shells expect), says
/// so in one line, and the image is as it was (byte for byte when nothing had been written yet; with
/// the same disk, snapshots and a clean check when VM state had been written and was freed).
/// </summary>
[Trait("Category", "Unit")]
public partial class SignalTests
{
    private const long StreamRam = 32 << 20;

    private static string WriteStream(TempDir dir)
    {
        string ram = dir.File("ram0");
        GuestRam.Create(ram, StreamRam, seed: 77);
        string stream = dir.File("s.mig");
        using (var profile = MachineProfile.Create("none", [new("ram0", ram)]))
            StreamFiles.WriteFile(stream, w => MigrationStream.Write(w, profile));
        return stream;
    }

    /// <summary>
    /// Starts <c>vmsnap import - IMAGE</c> with the signals at their default disposition (a test host
    /// started in the background may have inherited SIGINT ignored, which .NET then respects).
    /// </summary>
    private static Process StartImport(string image)
    {
        ProcessStartInfo psi = VmsnapCli.StartInfo(["import", "-", image, "--name", "cut"], [Tool.Find("env"), "--default-signal=INT,TERM", .. VmsnapCli.Command]);
        psi.RedirectStandardInput = true;
        psi.RedirectStandardOutput = true;
        psi.RedirectStandardError = true;
        return Tool.Start(psi);
    }

    /// <summary>True once the process has the image open: the command is running, its signal handler installed.</summary>
    private static bool HasOpen(Process p, string image)
    {
        try
        {
            return Directory.EnumerateFileSystemEntries($"/proc/{p.Id}/fd").Any(fd => new FileInfo(fd).LinkTarget == image);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return false;   // a descriptor closed while listed, or the process is gone
        }
    }

    /// <summary>Bytes written into the pipe <paramref name="pipe"/> (the write end) that the reader has not read yet (FIONREAD).</summary>
    private static int Unread(Stream pipe)
    {
        SafeHandle handle = pipe switch
        {
            System.IO.Pipes.PipeStream s => s.SafePipeHandle,
            FileStream f => f.SafeFileHandle,
            _ => throw new InvalidOperationException($"not a pipe: {pipe.GetType()}"),
        };
        const nuint Fionread = 0x541B;
        if (Ioctl((int)handle.DangerousGetHandle(), Fionread, out int unread) != 0)
            throw new InvalidOperationException($"ioctl FIONREAD failed: errno {Marshal.GetLastPInvokeError()}");
        return unread;
    }

    [LibraryImport("libc", EntryPoint = "ioctl", SetLastError = true)]
    private static partial int Ioctl(int fd, nuint request, out int count);

    private static void WaitFor(Func<bool> condition, Process p, string what)
    {
        var clock = Stopwatch.StartNew();
        while (!condition())
        {
            if (p.HasExited) Assert.Fail($"vmsnap import ended before {what}: exit {p.ExitCode}, {p.StandardError.ReadToEnd()}");
            if (clock.Elapsed > TimeSpan.FromSeconds(60)) Assert.Fail($"timed out waiting until {what}");
            Thread.Sleep(20);
        }
    }

    [QemuTheory]
    [InlineData("INT", 130)]
    [InlineData("TERM", 143)]
    public async Task A_signal_while_the_pipe_stalls_before_any_write_exits_128_plus_it_and_leaves_the_image_byte_for_byte(string signal, int exitCode)
    {
        using var dir = new TempDir();
        string image = QemuImage(dir);
        Tool.QemuImg("snapshot", "-c", "keep", image);
        string before = Qemu.Hash(image);
        byte[] stream = File.ReadAllBytes(WriteStream(dir));

        using Process p = StartImport(image);
        var stderr = p.StandardError.ReadToEndAsync();
        var stdout = p.StandardOutput.ReadToEndAsync();
        // The header and the first pages, far less than one write buffer; then nothing more.
        p.StandardInput.BaseStream.Write(stream, 0, 64 << 10);
        p.StandardInput.BaseStream.Flush();
        WaitFor(() => HasOpen(p, image), p, "it opened the image");
        WaitFor(() => Unread(p.StandardInput.BaseStream) == 0, p, "it read all it was given (then it waits on the stalled pipe)");
        Tool.Check("kill", "-" + signal, p.Id.ToString(CultureInfo.InvariantCulture));
        Assert.True(p.WaitForExit(TimeSpan.FromSeconds(30)), $"vmsnap import did not stop on SIG{signal}");
        p.StandardInput.Close();
        p.WaitForExit();
        string errors = await stderr;
        Assert.True(p.ExitCode == exitCode, $"exit code {p.ExitCode}: {errors}{await stdout}");
        Assert.Equal($"vmsnap: cancelled by SIG{signal}", errors.Trim());
        Assert.Equal(before, Qemu.Hash(image));
    }

    [QemuFact]
    public async Task A_SIGINT_after_VM_state_was_written_exits_130_and_frees_it_leaving_disk_and_snapshots_as_they_were()
    {
        using var dir = new TempDir();
        string image = QemuImage(dir);
        Qemu.Io(image, "write -P 0x5a 0 1M");
        Tool.QemuImg("snapshot", "-c", "keep", image);
        Qemu.Io(image, "write -P 0xa5 512k 1M");
        string original = dir.File("original.qcow2");
        File.Copy(image, original);
        string listing = Tool.QemuImg("snapshot", "-l", image);
        byte[] stream = File.ReadAllBytes(WriteStream(dir));
        long length = new FileInfo(image).Length;

        using Process p = StartImport(image);
        var stderr = p.StandardError.ReadToEndAsync();
        var stdout = p.StandardOutput.ReadToEndAsync();
        p.StandardInput.BaseStream.Write(stream, 0, stream.Length / 2);
        p.StandardInput.BaseStream.Flush();
        WaitFor(() => new FileInfo(image).Length > length + (8 << 20), p, "it wrote VM state into the image");
        Tool.Check("kill", "-INT", p.Id.ToString(CultureInfo.InvariantCulture));
        Assert.True(p.WaitForExit(TimeSpan.FromSeconds(30)), "vmsnap import did not stop on SIGINT");
        p.StandardInput.Close();
        p.WaitForExit();
        string errors = await stderr;
        Assert.True(p.ExitCode == 130, $"exit code {p.ExitCode}: {errors}{await stdout}");
        Assert.Equal("vmsnap: cancelled by SIGINT", errors.Trim());

        QemuImgCheck.AssertClean(image);
        Assert.Equal(listing, Tool.QemuImg("snapshot", "-l", image));
        Qemu.AssertSameContent(original, image, "qcow2");
        Qemu.AssertSameRaw(Qemu.ToRaw(original, dir, "keep"), Qemu.ToRaw(image, dir, "keep"));
    }
}
