using Vmsnap.Qcow2;
using Vmsnap.Tests.Interop;

namespace Vmsnap.Tests.Qcow2.Snapshots;

/// <summary>
/// Snapshot create and apply and the VM-state range (the guest offsets after the disk): QEMU's
/// snapshot takes the active L1 table whole, and <c>qemu-img snapshot -a</c> gives the active L1 the
/// snapshot's whole L1, VM-state range included. vmsnap leaves the same bytes there, as QEMU's own
/// <c>qemu-io read -b</c> (which reads the VM state through the active L1) shows on the same images.
/// </summary>
[Trait("Category", "Unit")]
public sealed class ApplyVmStateTests : IDisposable
{
    private const int Range = 256 << 10;   // bytes of the VM-state range compared
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    /// <summary>QEMU's view of the active VM-state range: qemu-io's hex dump of its first bytes.</summary>
    private static string QemuVmRange(string image)
    {
        string dump = Tool.QemuIo("-f", "qcow2", "-c", $"read -b -v 0 {Range}", image);
        return string.Join('\n', dump.Split('\n').Where(l => l.Length > 9 && l[8] == ':'));
    }

    /// <summary>A 4 MiB disk with data, and data in the active VM-state range written by QEMU (qemu-io write -b).</summary>
    private string Start(string name)
    {
        string image = _dir.File(name);
        Qemu.Create(image, 4 << 20, "cluster_size=4k");
        Qemu.Io(image, "write -P 0x11 0 64k", "write -b -P 0x5a 0 100k");
        return image;
    }

    private string Copy(string image, string name)
    {
        string copy = _dir.File(name);
        File.Copy(image, copy, overwrite: true);
        return copy;
    }

    /// <summary>Applies <paramref name="tag"/> with qemu-img on one copy and with vmsnap on another; both must leave the same disk and VM-state range.</summary>
    private void AssertApplyLikeQemu(string image, string tag, byte expected)
    {
        string byQemu = Copy(image, "apply-qemu.qcow2"), byVmsnap = Copy(image, "apply-vmsnap.qcow2");
        Tool.QemuImg("snapshot", "-a", tag, byQemu);
        using (var img = Qcow2Image.Open(byVmsnap)) img.ApplySnapshot(tag);
        QemuImgCheck.AssertClean(byQemu);
        QemuImgCheck.AssertClean(byVmsnap);
        string qemuRange = QemuVmRange(byQemu);
        Assert.Contains($"{expected:x2} {expected:x2} {expected:x2}", qemuRange);
        Assert.Equal(qemuRange, QemuVmRange(byVmsnap));
        Qemu.AssertSameContent(byVmsnap, Qemu.ToRaw(byQemu, _dir));
        // vmsnap reads the same bytes through the active table as QEMU does.
        using var check = Qcow2Image.Open(byVmsnap, new Qcow2OpenOptions { ReadOnly = true });
        byte[] ours = new byte[Range];
        check.Engine.ReadGuest(ours, check.Engine.VmStateOffset);
        Assert.Equal(DumpBytes(qemuRange), ours);
    }

    /// <summary>The bytes of a qemu-io hex dump ("00000000:  5a 5a ...  ZZ...").</summary>
    private static byte[] DumpBytes(string dump)
    {
        var bytes = new List<byte>();
        foreach (string line in dump.Split('\n'))
            foreach (string hex in line[10..].Trim().Split("  ")[0].Split(' ', StringSplitOptions.RemoveEmptyEntries))
                bytes.Add(Convert.ToByte(hex, 16));
        return bytes.ToArray();
    }

    [QemuFact]
    public void Applying_a_QEMU_snapshot_gives_the_active_table_its_VM_state_range_like_qemu_img()
    {
        string image = Start("qemu.qcow2");
        Tool.QemuImg("snapshot", "-c", "s", image);
        Qemu.Io(image, "write -b -P 0x77 0 50k", "write -P 0x22 0 4k");   // the active range and disk move on
        AssertApplyLikeQemu(image, "s", 0x5a);
    }

    [QemuFact]
    public void Applying_a_vmsnap_save_gives_the_active_table_its_VM_state_like_qemu_img()
    {
        string image = Start("saved.qcow2");
        byte[] state = Enumerable.Repeat((byte)0x3c, 150_000).ToArray();
        using (var img = Qcow2Image.Open(image))
        {
            using Qcow2VmStateArea area = img.OpenVmStateAreaForWriting();
            area.Write(state, 0);
            area.Flush();
            img.CreateSnapshot("saved", new Qcow2SnapshotCreateOptions { VmStateSize = state.Length });
        }
        Qemu.Io(image, "write -b -P 0x77 0 50k", "write -P 0x22 0 4k");
        AssertApplyLikeQemu(image, "saved", 0x3c);
    }

    [QemuFact]
    public void A_disk_only_create_then_apply_leaves_the_VM_state_range_as_QEMU_does()
    {
        string start = Start("start.qcow2");
        string byQemu = Copy(start, "qemu-all.qcow2"), byVmsnap = Copy(start, "vmsnap-all.qcow2");
        Tool.QemuImg("snapshot", "-c", "s", byQemu);
        using (var img = Qcow2Image.Open(byVmsnap)) img.CreateSnapshot("s");
        foreach (string image in new[] { byQemu, byVmsnap })
        {
            QemuImgCheck.AssertClean(image);
            Qemu.Io(image, "write -b -P 0x77 0 50k", "write -P 0x22 0 4k");
        }
        Tool.QemuImg("snapshot", "-a", "s", byQemu);
        using (var img = Qcow2Image.Open(byVmsnap)) img.ApplySnapshot("s");
        QemuImgCheck.AssertClean(byQemu);
        QemuImgCheck.AssertClean(byVmsnap);
        Assert.Equal(QemuVmRange(byQemu), QemuVmRange(byVmsnap));
        Qemu.Io(byVmsnap, "read -b -P 0x5a 0 100k", "read -P 0x11 0 64k");
    }

    [QemuFact]
    public void Applying_without_the_VM_state_reverts_the_disk_like_qemu_img_and_leaves_the_snapshots_VM_state_whole()
    {
        string image = Start("without.qcow2");
        Tool.QemuImg("snapshot", "-c", "s", image);   // QEMU's snapshot: its VM-state range holds 0x5a
        Qemu.Io(image, "write -b -P 0x77 0 50k", "write -P 0x22 0 4k");
        string byQemu = Copy(image, "without-qemu.qcow2"), byVmsnap = Copy(image, "without-vmsnap.qcow2");
        Tool.QemuImg("snapshot", "-a", "s", byQemu);
        using (var img = Qcow2Image.Open(byVmsnap)) img.ApplySnapshot("s", withVmState: false);
        QemuImgCheck.AssertClean(byVmsnap);
        // The disk is the snapshot's, as qemu-img's apply leaves it; the active VM-state range maps nothing (QEMU reads zeroes).
        Qemu.AssertSameContent(byVmsnap, Qemu.ToRaw(byQemu, _dir));
        Qemu.Io(byVmsnap, "read -b -P 0 0 100k");
        // The snapshot keeps its VM state: qemu-img's own apply of it still brings the 0x5a back.
        string again = Copy(byVmsnap, "without-again.qcow2");
        Tool.QemuImg("snapshot", "-a", "s", again);
        QemuImgCheck.AssertClean(again);
        Qemu.Io(again, "read -b -P 0x5a 0 100k");
        // QEMU writes a new VM state into the active range, and deleting the snapshot leaves no leak.
        Qemu.Io(byVmsnap, "write -b -P 0x66 0 100k");
        QemuImgCheck.AssertClean(byVmsnap);
        Tool.QemuImg("snapshot", "-d", "s", byVmsnap);
        QemuImgCheck.AssertClean(byVmsnap);
        Qemu.Io(byVmsnap, "read -b -P 0x66 0 100k", "read -P 0x11 0 64k");
    }
}
